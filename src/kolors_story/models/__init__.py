"""Models: loading Kolors from either release layout (``loading``), prompt encoding shared by the
cache and generation (``prompts``), the real release's architecture dicts (``architectures``),
random models of the real classes at any size (``random_init``), Kolors-IP-Adapter-Plus' files
(``ip_adapter``), the data stage's captioners (``captioner``) and the weights download
(``download``)."""
