"""Choosing the exit policy: every exit's statistics on the validation split, temperature scaling, thresholds for a
target (energy, exit fraction, accuracy floor) and Learn-then-Test risk control with a stated guarantee.

May import: errors, device, threads, data, model.
"""
