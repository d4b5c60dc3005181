"""thsrn-workbench: an interactive research workbench for image-text matching.

Subpackages: :mod:`thsrn_lib.data` (SCAN precomp data, the Scenes benchmark),
:mod:`thsrn_lib.models` (TSHSR, SGRAF, SHAN, HJE), :mod:`thsrn_lib.train`,
:mod:`thsrn_lib.evaluation`, :mod:`thsrn_lib.viz`, :mod:`thsrn_lib.attribution`,
:mod:`thsrn_lib.explorer`, :mod:`thsrn_lib.report`.
"""

__version__ = "0.1.0"
