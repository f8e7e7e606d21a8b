"""The paper tables, one module per table: ``experiments/tables/NAME.py`` for ``--table=NAME``.

Each module builds its `base.Table` and passes it to `base.register` at import;
`base.load_tables` imports every module of this package (`experiments.reproduce` calls it),
so a new table is a new file here and nothing else. Table modules import
`experiments.tables.base`, never `experiments.reproduce`.
"""
