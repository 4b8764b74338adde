// Not run on the CI machines (no Swift toolchain); `swift test` with HDB_FIXTURES set to the
// repository's tests/fixtures runs it where Swift exists.
import Foundation
import XCTest
@testable import Hdb

final class HdbTests: XCTestCase {
    let fixtures = ProcessInfo.processInfo.environment["HDB_FIXTURES"] ?? "../../tests/fixtures"

    func testGenerate() throws {
        let rt = try Runtime(device: "cpu")
        let model = try Model(runtime: rt, path: fixtures + "/tiny-sd")
        let session = try Session(model: model)
        var o = GenerateOptions()
        o.prompt = "a photo of sks person"; o.steps = 2; o.width = 64; o.height = 64; o.seed = 7; o.sampler = .ddim
        let a = try session.generate(o), b = try session.generate(o)
        XCTAssertEqual(a[0].rgb, b[0].rgb)
        XCTAssertThrowsError(try Model(runtime: rt, path: "/nonexistent/hdb-swift")) { e in
            XCTAssertEqual((e as? HdbError)?.status, .fileNotFound)
        }
    }
}
