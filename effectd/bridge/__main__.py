"""``python -m effectd.bridge``: the bridge command stand-alone."""

from effectd.bridge import main

main()
