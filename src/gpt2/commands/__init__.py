"""One module per command: parse flags, call the library, print. See :data:`gpt2.cli.COMMANDS`."""
