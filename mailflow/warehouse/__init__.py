"""The warehouse: schema, engine, dialect helpers and migrations."""
