"""The edges a user types at: the ``igdtrigger`` command (``main``), its subcommands and the
API client."""
