//! The layered drawing of a Spack spec's dependency DAG, as the spec page draws it in SVG.
//!
//! Computed here, in Rust, so that the page needs no script and no graph library:
//! 1. **Layers** by longest path from the root: a node sits one layer below the deepest of
//!    its dependents, so every edge points downwards (Kahn's order over the edges; a node on a
//!    cycle, which a Spack DAG never has, goes below everything else instead of looping).
//! 2. **Order within a layer** by barycentre: an edge spanning several layers passes through a
//!    dummy vertex in each layer it crosses (so it bends around the nodes there and counts in
//!    the ordering); starting from the order by name, each vertex is placed at the mean
//!    position of its neighbours in the layer above, then (sweeping back up) below, a few
//!    times over, which removes most crossings of typical DAGs.
//! 3. **Coordinates**: layers are rows, each centred; a node is as wide as its label.
//!
//! At most [`MAX_NODES`] nodes are drawn (the nearest layers to the root first); the number
//! left out is reported so that the page can say "and N more". The output holds only numbers
//! and the labels and links given: the template escapes every text it puts into the SVG.

use std::collections::HashMap;

/// Most nodes drawn.
pub const MAX_NODES: usize = 80;
/// Longest label drawn, in characters (longer ones end in `…`).
const MAX_LABEL: usize = 32;
const CHAR_WIDTH: f64 = 7.0;
const NODE_HEIGHT: f64 = 26.0;
const LAYER_GAP: f64 = 70.0;
const NODE_GAP: f64 = 16.0;
/// Width of the dummy vertex a long edge passes through in a row.
const DUMMY_WIDTH: f64 = 4.0;
const MARGIN: f64 = 10.0;
/// Barycentre sweeps (each one down and back up).
const SWEEPS: usize = 4;

/// A node to draw.
pub struct Node {
    pub id: String,
    pub label: String,
    /// Where the node links to (its spec page), if anywhere.
    pub href: Option<String>,
    /// The stylesheet class saying what the node is (`root`, `cached`, `missing`, `external`).
    pub class: &'static str,
    /// The tooltip.
    pub title: String,
}

/// An edge from a dependent to its dependency.
pub struct Edge {
    pub from: String,
    pub to: String,
    /// Spack's dependency types (`build`, `link`, `run`, `test`).
    pub deptypes: Vec<String>,
}

/// A placed node.
pub struct Placed {
    pub id: String,
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
    /// Where its label is anchored (its centre).
    pub text_x: f64,
    pub text_y: f64,
    pub label: String,
    pub href: Option<String>,
    pub class: &'static str,
    pub title: String,
}

/// A routed edge: an SVG path and its class (`e-link`, `e-run`, `e-build`, `e-test`).
pub struct Routed {
    pub path: String,
    pub class: &'static str,
    pub title: String,
}

/// The drawing.
pub struct Layout {
    pub width: f64,
    pub height: f64,
    pub nodes: Vec<Placed>,
    pub edges: Vec<Routed>,
    /// Nodes left out (beyond [`MAX_NODES`]).
    pub omitted: usize,
}

/// The class of an edge: link dependencies (what the spec is linked with) are drawn solid,
/// run dependencies in their own colour, build-only and test-only ones dashed.
fn edge_class(deptypes: &[String]) -> &'static str {
    let has = |t: &str| deptypes.iter().any(|d| d == t);
    if has("link") {
        "e-link"
    } else if has("run") {
        "e-run"
    } else if has("build") {
        "e-build"
    } else {
        "e-test"
    }
}

fn label_of(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL {
        label.to_owned()
    } else {
        let mut s: String = label.chars().take(MAX_LABEL - 1).collect();
        s.push('…');
        s
    }
}

/// Lays out the DAG of `nodes` (the first is the root) and `edges` (edges naming a node not
/// given are ignored).
pub fn layout(nodes: Vec<Node>, edges: &[Edge]) -> Layout {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
    let count = nodes.len();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); count];
    let mut parents: Vec<Vec<usize>> = vec![Vec::new(); count];
    let mut kept_edges = Vec::new();
    for e in edges {
        if let (Some(&a), Some(&b)) = (index.get(e.from.as_str()), index.get(e.to.as_str()))
            && a != b
        {
            children[a].push(b);
            parents[b].push(a);
            kept_edges.push((a, b, e));
        }
    }

    // 1. Longest-path layers, in Kahn's order.
    let mut layer = vec![0usize; count];
    let mut waiting: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut ready: Vec<usize> = (0..count).filter(|&i| waiting[i] == 0).collect();
    let mut done = vec![false; count];
    while let Some(n) = ready.pop() {
        done[n] = true;
        for &c in &children[n] {
            layer[c] = layer[c].max(layer[n] + 1);
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.push(c);
            }
        }
    }
    let deepest = layer.iter().copied().max().unwrap_or(0);
    for (i, d) in done.iter().enumerate() {
        if !d {
            layer[i] = deepest + 1;
        }
    }

    // Keep the nodes nearest the root.
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by(|&a, &b| {
        layer[a]
            .cmp(&layer[b])
            .then_with(|| nodes[a].label.cmp(&nodes[b].label))
    });
    let drawn: Vec<usize> = order.into_iter().take(MAX_NODES).collect();
    let omitted = count - drawn.len();
    let mut is_drawn = vec![false; count];
    for &n in &drawn {
        is_drawn[n] = true;
    }

    // Edges spanning several layers run through a chain of dummy vertices, one per layer
    // crossed, so that they take part in the ordering and bend around the nodes in between.
    // Vertices 0..count are the nodes, the rest dummies.
    let labels: Vec<String> = nodes.iter().map(|n| label_of(&n.label)).collect();
    let mut vlayer: Vec<usize> = layer.clone();
    let mut vwidth: Vec<f64> = labels
        .iter()
        .map(|l| l.chars().count() as f64 * CHAR_WIDTH + 16.0)
        .collect();
    let mut down: Vec<Vec<usize>> = vec![Vec::new(); count];
    let mut up: Vec<Vec<usize>> = vec![Vec::new(); count];
    let mut chains: Vec<(Vec<usize>, &Edge)> = Vec::new();
    for (a, b, e) in kept_edges {
        if !is_drawn[a] || !is_drawn[b] {
            continue;
        }
        let mut chain = vec![a];
        for l in layer[a] + 1..layer[b] {
            vlayer.push(l);
            vwidth.push(DUMMY_WIDTH);
            down.push(Vec::new());
            up.push(Vec::new());
            chain.push(vlayer.len() - 1);
        }
        chain.push(b);
        for pair in chain.windows(2) {
            down[pair[0]].push(pair[1]);
            up[pair[1]].push(pair[0]);
        }
        chains.push((chain, e));
    }

    // 2. Rows, nodes by name then dummies, reordered by barycentre sweeps.
    let rows_count = drawn.iter().map(|&n| layer[n]).max().map_or(0, |m| m + 1);
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); rows_count];
    for &n in &drawn {
        rows[layer[n]].push(n);
    }
    for v in count..vlayer.len() {
        rows[vlayer[v]].push(v);
    }
    let mut position = vec![0f64; vlayer.len()];
    let renumber = |row: &[usize], position: &mut [f64]| {
        for (i, &n) in row.iter().enumerate() {
            position[n] = i as f64;
        }
    };
    for row in &rows {
        renumber(row, &mut position);
    }
    let reorder = |row: &mut Vec<usize>, neighbours: &[Vec<usize>], position: &mut [f64]| {
        let mut keyed: Vec<(f64, usize)> = row
            .iter()
            .map(|&n| {
                let near = &neighbours[n];
                let key = if near.is_empty() {
                    position[n]
                } else {
                    near.iter().map(|&m| position[m]).sum::<f64>() / near.len() as f64
                };
                (key, n)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        *row = keyed.into_iter().map(|(_, n)| n).collect();
        renumber(row, position);
    };
    for _ in 0..SWEEPS {
        for row in rows.iter_mut().skip(1) {
            reorder(row, &up, &mut position);
        }
        for row in rows.iter_mut().rev().skip(1) {
            reorder(row, &down, &mut position);
        }
    }

    // 3. Coordinates: each row centred.
    let row_width =
        |row: &Vec<usize>| row.iter().map(|&n| vwidth[n]).sum::<f64>() + NODE_GAP * row.len().saturating_sub(1) as f64;
    let widest = rows.iter().map(row_width).fold(0f64, f64::max);
    let width = widest + 2.0 * MARGIN;
    let height = rows.len() as f64 * (NODE_HEIGHT + LAYER_GAP) - LAYER_GAP + 2.0 * MARGIN;
    let mut x = vec![0f64; vlayer.len()];
    let mut y = vec![0f64; vlayer.len()];
    for (r, row) in rows.iter().enumerate() {
        let mut at = MARGIN + (widest - row_width(row)) / 2.0;
        for &n in row {
            x[n] = at;
            y[n] = MARGIN + r as f64 * (NODE_HEIGHT + LAYER_GAP);
            at += vwidth[n] + NODE_GAP;
        }
    }

    let mut nodes_out = Vec::with_capacity(drawn.len());
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    for row in &rows {
        for &n in row.iter().filter(|&&n| n < count) {
            let Some(node) = slots[n].take() else { continue };
            nodes_out.push(Placed {
                id: node.id,
                x: x[n],
                y: y[n],
                width: vwidth[n],
                height: NODE_HEIGHT,
                text_x: x[n] + vwidth[n] / 2.0,
                text_y: y[n] + NODE_HEIGHT / 2.0 + 4.5,
                label: labels[n].clone(),
                href: node.href,
                class: node.class,
                title: node.title,
            });
        }
    }
    // An edge leaves the bottom of its dependent, runs straight down through each dummy's row
    // and curves (vertical tangents) between rows into the top of its dependency.
    let edges_out = chains
        .into_iter()
        .map(|(chain, e)| {
            let cx = |v: usize| x[v] + vwidth[v] / 2.0;
            let first = chain[0];
            let mut path = format!("M{:.1},{:.1}", cx(first), y[first] + NODE_HEIGHT);
            let mut from = (cx(first), y[first] + NODE_HEIGHT);
            for &v in &chain[1..] {
                let to = (cx(v), y[v]);
                let mid = (from.1 + to.1) / 2.0;
                path.push_str(&format!(
                    " C{:.1},{mid:.1} {:.1},{mid:.1} {:.1},{:.1}",
                    from.0, to.0, to.0, to.1
                ));
                from = to;
                if v >= count {
                    from = (to.0, to.1 + NODE_HEIGHT);
                    path.push_str(&format!(" L{:.1},{:.1}", from.0, from.1));
                }
            }
            Routed {
                path,
                class: edge_class(&e.deptypes),
                title: e.deptypes.join(", "),
            }
        })
        .collect();
    Layout {
        width,
        height,
        nodes: nodes_out,
        edges: edges_out,
        omitted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> Node {
        Node {
            id: id.to_owned(),
            label: id.to_owned(),
            href: None,
            class: "cached",
            title: String::new(),
        }
    }

    fn edge(from: &str, to: &str, types: &[&str]) -> Edge {
        Edge {
            from: from.to_owned(),
            to: to.to_owned(),
            deptypes: types.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn row_of(l: &Layout, label: &str) -> f64 {
        l.nodes.iter().find(|n| n.label == label).map(|n| n.y).unwrap_or(-1.0)
    }

    #[test]
    fn layers_follow_the_longest_path_and_edges_point_down() {
        // app -> b -> a, app -> a: a sits below b, not beside it.
        let l = layout(
            vec![node("app"), node("a"), node("b")],
            &[
                edge("app", "b", &["build", "link"]),
                edge("b", "a", &["link"]),
                edge("app", "a", &["run"]),
            ],
        );
        assert!(row_of(&l, "app") < row_of(&l, "b") && row_of(&l, "b") < row_of(&l, "a"));
        assert_eq!(l.edges.len(), 3);
        assert_eq!(l.omitted, 0);
        let classes: Vec<_> = l.edges.iter().map(|e| e.class).collect();
        assert!(classes.contains(&"e-link") && classes.contains(&"e-run"));
    }

    #[test]
    fn barycentres_uncross_a_crossed_pair() {
        // Rows by name alone would be [a, b] over [x, y] with a->y and b->x: crossed.
        let l = layout(
            vec![node("r"), node("a"), node("b"), node("y"), node("x")],
            &[
                edge("r", "a", &["link"]),
                edge("r", "b", &["link"]),
                edge("a", "y", &["link"]),
                edge("b", "x", &["link"]),
            ],
        );
        let x_of = |label: &str| l.nodes.iter().find(|n| n.label == label).map(|n| n.x).unwrap_or(-1.0);
        assert_eq!(x_of("a") < x_of("b"), x_of("y") < x_of("x"), "no crossing");
    }

    #[test]
    fn large_dags_are_bounded_and_cycles_do_not_loop() {
        let mut nodes = vec![node("root")];
        let mut edges = Vec::new();
        for i in 0..200 {
            nodes.push(node(&format!("n{i:03}")));
            edges.push(edge("root", &format!("n{i:03}"), &["build"]));
        }
        edges.push(edge("n000", "n001", &["link"]));
        edges.push(edge("n001", "n000", &["link"]));
        let l = layout(nodes, &edges);
        assert_eq!(l.nodes.len(), MAX_NODES);
        assert_eq!(l.omitted, 201 - MAX_NODES);
        assert!(l.width > 0.0 && l.height > 0.0);
    }
}
