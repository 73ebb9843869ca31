//! Helpers the kernel tests share: how far apart two tensors are, and a fused kernel held to its
//! composed form (one input, or several).

use candle_core::{DType, Result, Tensor, Var};

/// The largest absolute element-wise difference, as f64.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Fused and composed forms agree in value and in gradient against one random cotangent.
pub fn check_fused(
    fused: impl Fn(&Tensor) -> Result<Tensor>,
    composed: impl Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    tol: f64,
) {
    let cot = Tensor::randn(0f64, 1., x.shape(), x.device())
        .unwrap()
        .to_dtype(x.dtype())
        .unwrap();
    check_fused_inputs(
        |is_fused, xs| {
            if is_fused {
                fused(xs[0])
            } else {
                composed(xs[0])
            }
        },
        &[x],
        &cot,
        &["values", "gradients"],
        tol,
        format_args!("{:?}", x.dtype()),
    );
}

/// Asserts that `a` and `b` differ by less than `tol` everywhere; `what` names them on failure.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: impl std::fmt::Display) {
    let d = max_diff(a, b);
    assert!(d < tol, "{what} differ by {d}");
}

/// The fused (`op(true, …)`) and composed (`op(false, …)`) forms of an op of several inputs agree
/// in value and in every input's gradient of `Σ y⊙cot`. `names`: the value's, then each
/// gradient's, for the failure message, which also carries `ctx`.
pub fn check_fused_inputs(
    op: impl Fn(bool, &[&Tensor]) -> Result<Tensor>,
    inputs: &[&Tensor],
    cot: &Tensor,
    names: &[&str],
    tol: f64,
    ctx: impl std::fmt::Display,
) {
    assert_eq!(
        names.len(),
        inputs.len() + 1,
        "a name for the value and each gradient"
    );
    let run = |fused: bool| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|x| Var::from_tensor(x).unwrap())
            .collect();
        let xs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let y = op(fused, &xs).unwrap();
        let gs = (y.clone() * cot)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads = vars.iter().map(|v| gs.get(v).expect("gradient").clone());
        std::iter::once(y).chain(grads).collect::<Vec<_>>()
    };
    let (fused, composed) = (run(true), run(false));
    for ((name, f), c) in names.iter().zip(&fused).zip(&composed) {
        assert_close(f, c, tol, format_args!("{name} ({ctx})"));
    }
}
