"""Channel-dependency analysis: layouts, the rule table, union-find and groups."""

from prunefx.analysis.groups import ChannelGroup, GroupMember, build_groups
from prunefx.analysis.propagate import ChannelAnalysis, Role, analyze

__all__ = ["ChannelAnalysis", "ChannelGroup", "GroupMember", "Role", "analyze", "build_groups"]
