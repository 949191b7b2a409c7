"""The repository: lint, the walls between rooms, generated files and their regeneration."""
