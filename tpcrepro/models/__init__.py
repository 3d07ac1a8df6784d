"""Models registered with timm. Importing this package registers them."""

from tpcrepro.models import smoke  # noqa: F401  (registers vit_smoke_*)
