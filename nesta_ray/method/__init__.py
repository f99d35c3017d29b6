"""The compression method as pure math: ranks, whitening, decompositions, drift scores (torch only, no I/O)."""
