"""``python -m dsched.chaos``: see :mod:`chaos.runner`."""

from __future__ import annotations

from dsched.chaos.runner import main

raise SystemExit(main())
