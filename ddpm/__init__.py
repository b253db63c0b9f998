"""The `ddpm` command: thin entry points that parse options and call the packages."""
