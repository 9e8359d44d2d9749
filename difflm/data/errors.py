"""The one exception type of ``difflm.data``.

Every problem a user can fix in their spec or their files (a missing path, a bad
JSON line, a corpus too small for ``seq_len``, an unreachable hub) is raised as
:class:`DataError` with a message that names the thing to fix. It subclasses
``ValueError`` so callers that validate configs can catch both alike.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data or tokenizer problem the user can fix; the message says how."""
