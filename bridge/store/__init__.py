"""The imaging store: SQLAlchemy models, repository functions, migrations and the image file store."""
