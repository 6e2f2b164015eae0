"""Stages: what each stage of DALL·E supplies to the shared training core (a Task)."""
