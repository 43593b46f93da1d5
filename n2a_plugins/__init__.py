"""n2a's built-in plugins. Each module registers through the `n2a` entry-point group in
pyproject.toml, exactly as a third-party package would; n2a_core never imports them."""
