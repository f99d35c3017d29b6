"""The checkpoint: one room for the ``nesta_ray.lowrank`` format (names in ``layout``, ``nesta.json`` in ``meta``,
runs on storage in ``runs``, the per-layer stage in ``stage``), its writer and its reader."""
