"""What both roles share: wire format, codecs, config, models, security, run-folder names."""
