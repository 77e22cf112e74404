-- ListNodes and watch snapshots page in the order ONLINE first, then by id: an index in that order
-- makes each page a range scan instead of a scan and sort of every node (10,000 nodes: ten pages).
CREATE INDEX nodes_list_order ON registry.nodes (((state <> 2)::int), id);
