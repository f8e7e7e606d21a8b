"""Table modules for `experiments.reproduce`.

Each module here builds its `reproduce.Table` and calls `reproduce.register` at import;
`experiments.reproduce` imports every module of this package, so a new table is a new
file here and nothing else.
"""
