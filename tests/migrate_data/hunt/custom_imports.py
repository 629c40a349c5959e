# Test fixture: custom_imports naming the 0.x project's own modules, which are not
# installed next to the 1.x stack.
_base_ = ['./sngan_base.py']
custom_imports = dict(imports=['mmgen_0x_private_ext.hooks'], allow_failed_imports=False)
