"""The example run configs; shipped in the wheel as lssfl.configs (`lssfl init`)."""
