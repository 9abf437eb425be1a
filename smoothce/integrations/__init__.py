"""Drop-in adapters for the libraries people train with. Each module imports its library, so import
the one you use: ``smoothce.integrations.timm`` (needs timm) or ``smoothce.integrations.transformers``
(needs transformers); ``import smoothce`` imports neither."""
