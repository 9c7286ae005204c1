"""Models: loading Kolors from either release layout (``loading``), prompt encoding shared by the
cache and generation (``prompts``), the real and small configs (``configs``), the random tiny /
bench / scorer models built offline in the real layouts (``random_init``) and the weights
download (``download``)."""
