"""The model's structure: the architecture map, decoder-layer surgery, the low-rank module and calibration."""
