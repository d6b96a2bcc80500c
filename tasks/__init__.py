"""The stages (one module per stage family) and the library modules they share."""
