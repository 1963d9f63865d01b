//! `herding`: offline herding, the quality reference GraB approximates online. All n gradients of the
//! epoch are stored; at the epoch's end they are centered by their exact mean and the sign rule with
//! front/back assembly runs over them in visit order, `rounds` times, each pass on the last pass's order.

use crate::assembly::FrontBack;
use crate::elem::StateElem;
use crate::kernels::{dot_diff, update_diff, Layout, Pieces};
use crate::sign::SignRule;
use crate::stored_gradients::{visited, StoredGradients};

/// One herding pass over `list`: (+1 units in list order, -1 units in list order).
fn pass<S: StateElem>(
    store: &StoredGradients<S>,
    mean: &[f64],
    list: &[u32],
    rule: &mut SignRule,
    n: usize,
) -> (Vec<u32>, Vec<u32>) {
    let d = store.d;
    let layout = Layout::new(vec![d]);
    let m = Pieces { slices: vec![mean] };
    let mut s = vec![0.0f64; d];
    let (mut front, mut back) = (Vec::new(), Vec::new());
    for &i in list {
        let g = Pieces {
            slices: vec![store.row(i)],
        };
        let (dot, norm2) = dot_diff(&layout, &s, &g, &m);
        let dec = rule.decide(dot, norm2, n, d);
        update_diff::<f64, S, f64, f64>(&layout, &mut s, &g, &m, dec.eps * dec.scale, None);
        if dec.eps > 0.0 {
            front.push(i);
        } else {
            back.push(i);
        }
    }
    (front, back)
}

/// The next order: the herded order of the units seen this epoch (front block, then the back block
/// reversed), with the units not seen in their current order between the two blocks of the last pass.
pub fn next_order<S: StateElem>(
    store: &StoredGradients<S>,
    assembler: &FrontBack,
    current: &[u32],
    rounds: u32,
    rule: &mut SignRule,
    n: usize,
) -> Vec<u32> {
    let mut list = visited(assembler).to_vec();
    let mean = store.mean(&list);
    let mut out = Vec::with_capacity(current.len());
    for round in 0..rounds.max(1) {
        let (front, back) = pass(store, &mean, &list, rule, n);
        if round + 1 == rounds.max(1) {
            out.extend_from_slice(&front);
            out.extend(current.iter().filter(|&&i| !assembler.is_taken(i)));
            out.extend(back.iter().rev());
        } else {
            list = front;
            list.extend(back.iter().rev());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;

    #[test]
    fn hand_computed_two_rounds() {
        // d = 1: g = [3, 1, -1, -3, 4] (units 0..4), mean 4/5 = 0.8, z = [2.2, 0.2, -1.8, -3.8, 3.2].
        // Pass 1 over [0, 1, 2, 3, 4]: s=0 -> +, s=2.2; <s,0.2> > 0 -> -, s=2.0; <2,-1.8> < 0 -> +,
        //   s=0.2; <0.2,-3.8> < 0 -> +, s=-3.6; <-3.6,3.2> < 0 -> +, s=-0.4. front [0,2,3,4], back [1]
        //   -> list [0, 2, 3, 4, 1].
        // Pass 2 over [0, 2, 3, 4, 1]: + (2.2); <2.2,-1.8> < 0 -> + (0.4); <0.4,-3.8> < 0 -> + (-3.4);
        //   <-3.4,3.2> < 0 -> + (-0.2); <-0.2,0.2> < 0 -> + . All front: [0, 2, 3, 4, 1].
        let g = [3.0, 1.0, -1.0, -3.0, 4.0];
        let mut store = StoredGradients::<f64>::new("herding", 5, 1, 0, None).unwrap();
        let mut asm = FrontBack::new(5);
        store
            .step(
                &Batch::from_slice(&g, 5, 1).unwrap(),
                &[0, 1, 2, 3, 4],
                &mut asm,
            )
            .unwrap();
        let cur = [0, 1, 2, 3, 4];
        let mut rule = SignRule::deterministic();
        assert_eq!(
            next_order(&store, &asm, &cur, 1, &mut rule, 5),
            vec![0, 2, 3, 4, 1]
        );
        assert_eq!(
            next_order(&store, &asm, &cur, 2, &mut rule, 5),
            vec![0, 2, 3, 4, 1]
        );
        // Only units 3 and 1 seen (in that order): mean -1, z = [-2, 2]: + then <-2,2> < 0 -> +.
        // Unseen 0, 2, 4 go between the (full) front block and the (empty) back block.
        let mut asm = FrontBack::new(5);
        store
            .step(
                &Batch::from_slice(&[-3.0, 1.0], 2, 1).unwrap(),
                &[3, 1],
                &mut asm,
            )
            .unwrap();
        assert_eq!(
            next_order(&store, &asm, &cur, 1, &mut rule, 5),
            vec![3, 1, 0, 2, 4]
        );
    }
}
