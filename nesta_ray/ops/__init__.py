"""Operations on a model: evaluation (``evaluation``), the quality gate (``gate``), the automatic ratio's search
(``ratio_search``) and job metrics (``metrics``)."""
