"""sdlite subpackage."""

import logging as _logging

# diffusers warns at import, on stderr, that the "optimum" import name has two distributions whenever
# optimum-intel is installed beside optimum (which the bench extra does); it is not about the user's model.
_logging.getLogger("diffusers.utils.import_utils").addFilter(
    lambda record: not record.getMessage().startswith("Multiple distributions found for package")
)
