"""The synthetic task world: seeded edit tasks, the renderer that draws them, the judge that scores an edit.

The built-in small model (`kontext_core.small_model`) is trained and measured on these tasks; nothing in
the inference path imports this package.
"""
