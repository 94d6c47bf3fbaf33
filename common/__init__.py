"""What both roles share: wire format, codecs, config, data, models, security."""
