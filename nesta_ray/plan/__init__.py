"""Planning a job: which linears at which rank (``linears``), what it needs (``sizing``), how long (``timing``)."""
