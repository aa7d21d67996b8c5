"""How sensitive each global attention layer is to K/V pruning and query merging.

`profile_clip` measures one clip (spark3r.profiler.run), `build_profile` aggregates clips into a `Profile`
(spark3r.profiler.format), and `profile_layers` runs it all (spark3r.profiler.pipeline; the console script
profile-layers is spark3r.commands.profile_layers).
"""
from spark3r.profiler.aggregate import build_profile
from spark3r.profiler.format import Profile, load_profile, save_profile
from spark3r.profiler.run import ProfileOptions, profile_clip, profile_levels

__all__ = ["Profile", "ProfileOptions", "build_profile", "load_profile", "profile_clip", "profile_levels",
           "save_profile"]
