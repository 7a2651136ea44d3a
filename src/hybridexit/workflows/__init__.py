"""What a user runs end to end: training (one loop, one phase per mode, recipes as data), the learned codec's
training, evaluation (the one conditional evaluation loop, with or without a codec), design-space sweeps and the
report of the paper's figures and tables.

May import: errors, device, threads, data, model, calibration, codecs, engines, runtime.
"""
