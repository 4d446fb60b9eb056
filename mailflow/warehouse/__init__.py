"""The warehouse: schema, engine, migrations and the synthetic shop."""
