"""kolors-story: Kolors style LoRAs and 8-image stories (README.md; docs/architecture.md).

Importing the package quiets two import-time messages that installing torchao (the int8 text
encoder's library) makes its neighbours print on every run, and that no user can act on: torch's
notice to torchao's developers about registering Enums, and diffusers' note that it cannot read
checkpoints serialized by this torchao version (the project never loads such checkpoints).
"""

import logging as _logging

for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
