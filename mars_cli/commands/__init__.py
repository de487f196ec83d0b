"""One short module per subcommand: flags → a call into a core module → records."""
