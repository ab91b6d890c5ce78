"""``python -m cosedge.admin hash-password [USER]``: print a line for the telnet password file."""

from .passwords import main

if __name__ == "__main__":
    raise SystemExit(main())
