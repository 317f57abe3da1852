"""sdlite subpackage."""
