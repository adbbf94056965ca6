"""Data: the synthetic world (``world``), the registry of real datasets with local-file overrides
(``registry``), tokenised training batches (``batches``) and the shared prompt formats (``formats``)."""
