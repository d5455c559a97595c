"""The paper's facts as the tests state them (VPT, Jia et al., ECCV 2022): written here, never read from the code."""

# The paper's six tuning protocols, in its order (Fig. 3's legend).
PAPER_METHODS = ["full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep"]
