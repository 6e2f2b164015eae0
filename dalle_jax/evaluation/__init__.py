"""Judging generated images: does an image show what its caption asks for?"""
