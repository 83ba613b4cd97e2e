// Echo client as in the tutorials: connects, writes its text with no newline
// (socket->write(text.toUtf8())), and prints what comes back once it is all there.
// Usage: echo_client HOST PORT TEXT. Exit 0 when the echo equals the text, 1 otherwise.
#include <QCoreApplication>
#include <QTcpSocket>
#include <QTimer>
#include <cstdio>

int main(int argc, char *argv[])
{
    QCoreApplication app(argc, argv);
    QStringList args = app.arguments();
    if (args.size() != 4) {
        fprintf(stderr, "usage: echo_client HOST PORT TEXT\n");
        return 2;
    }
    QByteArray sent = args[3].toUtf8();
    QByteArray received;
    QTcpSocket *m_tcp = new QTcpSocket(&app);
    QObject::connect(m_tcp, &QTcpSocket::connected, [&]() {
        m_tcp->write(sent);
    });
    QObject::connect(m_tcp, &QTcpSocket::readyRead, [&]() {
        received += m_tcp->readAll();
        if (received.size() >= sent.size()) {
            fwrite(received.constData(), 1, received.size(), stdout);
            fflush(stdout);
            m_tcp->disconnectFromHost();
            app.exit(received == sent ? 0 : 1);
        }
    });
    QObject::connect(m_tcp, &QTcpSocket::errorOccurred, [&]() {
        fprintf(stderr, "socket error: %s\n", qPrintable(m_tcp->errorString()));
        app.exit(1);
    });
    QTimer::singleShot(10000, [&]() {
        fprintf(stderr, "timed out\n");
        app.exit(1);
    });
    m_tcp->connectToHost(args[1], args[2].toUShort());
    return app.exec();
}
