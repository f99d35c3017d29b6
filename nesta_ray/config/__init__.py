"""Job configuration: the schema (``schema``) and loading it from YAML with overrides (``loading``)."""
