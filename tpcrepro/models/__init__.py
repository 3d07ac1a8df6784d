"""Models registered with timm. Importing this package registers them.

Each behaves as any timm model (forward -> logits); the hooks the trainer and
the measuring code use are written down in tpcrepro.models.api.
"""

from __future__ import annotations

from tpcrepro.models.api import is_adaptive, stats_forward  # noqa: F401
from tpcrepro.models import smoke  # noqa: F401,E402  (registers vit_smoke_*)
from tpcrepro.models import vit  # noqa: F401  (registers tpc_deit_*, tpc_vit_smoke)
from tpcrepro.models import avit, dynamicvit, evit, tome  # noqa: F401,E402  (registers avit_*, dynamicvit_*, evit_*, tome_*)
from tpcrepro.models import lvvit  # noqa: F401,E402  (registers lvvit_*, tpc_lvvit_*, evit_lvvit_*)
from tpcrepro.models import swin  # noqa: F401,E402  (registers swin_smoke, tpc_swin_*)

from tpcrepro.methods import method_kwargs  # noqa: F401,E402  (a recipe's model arguments: tpcrepro/methods.py)
