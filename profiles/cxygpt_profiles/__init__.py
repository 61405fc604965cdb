"""CxyGPT profiles: the table (data), model facts, VRAM fit estimate, profile selection and predicted speed."""
from .engine import engine_args
from .fit import FitEstimate, estimate_fit
from .load import default_table, load_table
from .predict import Prediction
from .select import AUTO, GpuNode, NoFit, Selection, select_profile
from .table import (
                    Limits,
                    ModelCatalog,
                    ModelFacts,
                    Profile,
                    ProfileTable,
                    ProfileTableError,
                    default_catalog,
                    load_catalog,
)

__all__ = ["AUTO", "FitEstimate", "GpuNode", "Limits", "ModelCatalog", "ModelFacts", "NoFit", "Prediction", "Profile",
           "ProfileTable", "ProfileTableError", "Selection", "default_catalog", "default_table", "engine_args",
           "estimate_fit", "load_catalog", "load_table", "select_profile"]
