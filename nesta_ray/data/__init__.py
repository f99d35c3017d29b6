"""Calibration and evaluation text: files and datasets (``text``), request logs (``requestlogs``, ``selection``)
and the windows a job's config selects (``windows``)."""
