-- syncrelay schema 2: which relay node holds each daemon's connection (DESIGN.md,
-- "Cluster"). A node stores its `cluster.node` with every connect and last-seen time it
-- stores; a lone relay leaves it empty. Shown to operators only while the daemon is online.

ALTER TABLE daemons ADD COLUMN node text;
