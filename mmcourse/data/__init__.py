"""The course's worlds: the Shapes world (generated) and AV-Digits (real digits + speech).

Import the modules directly: ``from mmcourse.data import shapes, avdigits``.
Taught in notebooks/00_setup_and_tour.
"""
