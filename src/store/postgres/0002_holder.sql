-- syncrelay schema 2: which relay node holds each daemon's connection (DESIGN.md,
-- "Cluster"). A daemon's connect stores the node's `cluster.node` (a last-seen write only
-- fills it in when empty); a lone relay leaves it empty. Shown to operators only while the
-- daemon is online.

ALTER TABLE daemons ADD COLUMN node text;
